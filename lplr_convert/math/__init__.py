"""Pure numerical kernels: tensors in, tensors out. No paths, logging or config objects here."""
