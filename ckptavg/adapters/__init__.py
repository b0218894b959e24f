"""PEFT LoRA adapters averaged exactly: factors stacked (`concat`), truncated by SVD (`svd`), or the
average merged into a base model (`merge`); never the factors averaged one by one."""
