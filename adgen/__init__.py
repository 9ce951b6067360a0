"""adgen: fine-tune chat LLMs to write Chinese ad copy from product attributes."""

__version__ = "0.1.0"
