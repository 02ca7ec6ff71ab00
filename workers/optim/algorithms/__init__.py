"""One module per optimizer algorithm (LBFGS: a package): its update rule and its torch-style class."""
