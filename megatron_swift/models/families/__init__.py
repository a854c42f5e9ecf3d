"""One module per model family; importing the package registers nothing until `all_families()` scans it."""
