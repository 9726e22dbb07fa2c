"""segloss losses. Every loss shares :mod:`segloss.losses.inputs` for activation, targets, masks and reduction."""

from segloss.losses.inputs import set_input_checks

__all__ = ["set_input_checks"]
