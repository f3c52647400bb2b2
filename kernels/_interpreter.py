"""Triton 3.6's interpreter (TRITON_INTERPRET=1) turns a kernel scalar, which it holds as a
1-element array, into a Python int with int(array); numpy >= 2.5 refuses that for an array
that is not 0-d, so every loop with a runtime bound (`range(start, end, BLOCK)`) fails there.
Triton 3.8's interpreter squeezes the array first. No kernel form avoids it and still compiles
to the same GPU code: a `while` loop would pass, but compiles to a loop Triton does not
software-pipeline, and a constexpr bound recompiles per shape. So, where the interpreter runs,
its scalars' __index__ squeezes as 3.8's does; compiled kernels never run this code."""

import os


def _squeezing_index(self) -> int:
    return int(self.handle.data.squeeze())


def patch_scalar_index() -> bool:
    """Make the interpreter's scalars usable as loop bounds with any numpy (idempotent; only
    under TRITON_INTERPRET=1, and only where the interpreter patches tensors the way 3.6 and
    3.8 do). True when the patch is in place."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return False
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:
        return False
    if getattr(original, "squeezes_scalars", False):
        return True

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        # the scope restores its changes in reverse order: this one first, then the original
        scope.set_attr(tensor, "__index__", _squeezing_index)

    patch_lang_tensor.squeezes_scalars = True
    interpreter._patch_lang_tensor = patch_lang_tensor
    return True
