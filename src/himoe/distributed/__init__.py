"""Training on many processes with torch.distributed, launched by torchrun: data-parallel
(DDP), sharded (FSDP2) and expert-parallel. See docs/many_gpus.md.

launch.py joins the process group, plan.py is what the trainer asks of the run,
expert_parallel.py moves tokens to their experts' ranks, collectives.py holds the small
collectives that model code may call (no-ops in one process). Nothing is imported here,
so model code can import collectives without a cycle.
"""
