"""The segment job: outputs of one scan (labels, statistics, split, DICOM-SEG, probabilities), archives (pipeline, --continue, parts), Ray Data; imports the core and every stage below it."""
