"""Fitting the GPU before training: the peak memory and time of one training update, predicted from the real model
traced on fake tensors (no GPU, no weights, seconds on a CPU), and `optim.grad_accum_steps: auto` chosen from it.

    tracker.py   LiveBytes: live bytes of every storage an operation creates, by part, and their peak
    gpu.py       what a GPU runs and holds that the CPU trace does not show: its attention kernel, CUDA autocast's
                 fp32 rules, workspaces, the allocator's reserve, the CUDA context (named constants); which GPU
    trace.py     the run's models built as the solver builds them, on fake tensors, and one update traced
    fit.py       rows per micro-batch (parts, total, fits, FLOPs, times), `auto`'s choice, the refusal
    command.py   `make plan` (tools/plan.py): MODEL= a released architecture or a folder's xp.cfg, the JSON
"""
