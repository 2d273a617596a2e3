"""One module per pattern; the public names are re-exported from `resilient`."""
