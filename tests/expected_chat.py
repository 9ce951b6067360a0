"""The exact text a record must become (the foundation issue's acceptance strings), shared by tests."""

CONTENT = "类型#裙*颜色#黑色"
SUMMARY = "黑色长裙。"
LLAMA3_PROMPT = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n类型#裙*颜色#黑色<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)
LLAMA3_RESPONSE = "黑色长裙。<|eot_id|>"
CHATML_PROMPT = (
    "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n类型#裙*颜色#黑色<|im_end|>\n<|im_start|>assistant\n"
)
CHATML_RESPONSE = "黑色长裙。<|im_end|>"
