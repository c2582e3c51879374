"""The classic BatchNorm training experiments, with torch.nn.BatchNorm, bnfused and the from-scratch BatchNorm.

python -m benchmarks.experiments {mlp-fashion,lenet,mnist-bn,mnist-dropout,all} [options]

specs.py     the four experiments as data: dataset, model per configuration, optimiser, epochs
train.py     one run per configuration and BatchNorm, interleaved epoch by epoch
records.py   the result records (OUT/results.json) and the environment they were measured in
report.py    the Markdown comparison table (OUT/experiments.md)
plots.py     loss and accuracy curves (OUT/experiments-<experiment>.png)
command.py   the command line that ties them together
"""
