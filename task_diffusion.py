"""TaskDiffusion: Multi-Task Dense Predictions via Unleashing the Power of Diffusion (Yang et al., ICLR 2025).

Not implemented yet (tracked in the issues): this stub exits with status 2.
"""
import sys

if __name__ == "__main__":
    print("task_diffusion.py: not implemented yet", file=sys.stderr)
    sys.exit(2)
