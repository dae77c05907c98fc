"""Training loops: pretrain (the base), grpo (teachers, GRPO-Mix), coldstart, opd."""
