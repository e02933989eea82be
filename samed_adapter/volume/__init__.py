"""What the model sees of a scan: geometry (orientation, slices and back) and intensity preprocessing; imports numpy and nibabel only, nothing of this package."""
