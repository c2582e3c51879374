"""Multi-process runs under torchrun: the SyncBatchNorm step benchmark and a DDP LeNet example.

launch.py       torchrun's environment -> process group (NCCL on cuda:LOCAL_RANK, gloo on CPU);
                a plain ``python -m`` run starts torchrun --standalone itself
bench_sync.py   time of one SyncBatchNorm training step, slowest rank, per backend
ddp_lenet.py    LeNet trained with DistributedDataParallel and bnfused.SyncBatchNorm
"""
