"""The transformers integration: the quantizer `from_pretrained` uses (`quantizer`, registered by `_hook` without
importing transformers), the weight converters it runs (`converters`), transformers' own name mapping (`mapping`),
model surgery and the runtime modules (`modeling`), and `load_model` / `load_state_dict` (`loading`).

Importing this package imports neither torch nor transformers.
"""
