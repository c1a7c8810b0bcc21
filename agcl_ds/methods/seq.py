"""`seq`: plain sequential fine-tuning, the lower bound every method is measured against."""

from agcl_ds.methods.base import Method


class Seq(Method):
    """Trains each task in turn with nothing added: every lifecycle call is the base no-op."""

    name = "seq"
