"""The three per-volume stages SAMed.segment and the jobs share (prepare, predict, restore); imports the stages below it (volume .. surgery)."""
