"""
`python -m fast [model.py's flags]`: model.py's command line through the fast path (fast.for_inference: prepacked
linears, attention kernels, prefix cache, --quant int4, --compile). `python model.py` without --plain runs this.

    python -m fast --prompt "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
"""
import model
from fast import for_inference
from fast.cpu import best_dtype

if __name__ == "__main__":
    model.main(speed=for_inference, pick=best_dtype)
