"""One module per optimizer algorithm: its update rule and its torch-style class."""
