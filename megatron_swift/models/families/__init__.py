"""One module per model family; importing the package registers nothing until `families()` scans it."""
