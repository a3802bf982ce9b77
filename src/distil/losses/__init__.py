"""Pure loss functions in the style of torch.nn.functional: arguments are (student, teacher, ...)."""
