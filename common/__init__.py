"""What every package shares and no package owns: the strict config base and its error messages.

    from common import StrictModel, format_validation_error, padded_vocab_size

Kept free of torch, DeepSpeed and Ray so any layer (model/, data/, distributed/, tune/) can import it.
"""
from common.validation import StrictModel, format_validation_error, padded_vocab_size

__all__ = ["StrictModel", "format_validation_error", "padded_vocab_size"]
