"""The bounds every experiment file is held to, each sized by what a real run needs, with the reason.

Every number has a finite range, every list and string a longest length, and the YAML document
itself a size, a depth and a count of nodes with its aliases expanded. A typo or a hostile file
is then refused in one line before anything starts, instead of hanging the validation, building
a billion roles, overflowing a timeout inside torchft, or failing to write a file hours later.
The field docs (docs/config.md) and the JSON Schema show each range; the ranges are checked here
once, by the schema, so no process downstream needs to guard against them again.
"""

# Replica groups are torchx roles, each a torchrun with its own lighthouse session and (with several
# nodes) a rendezvous port lighthouse.port + 2 + group. Published fault-tolerant runs use a few to a few
# dozen groups; 256 leaves room and keeps a dry run's plan (one role per group) instant to print.
MAX_GROUPS = 256
# Worker processes per node (torchrun --nproc_per_node): one per GPU on GPU nodes (8 to 16 today); a CPU
# node rarely has more than 128 cores to give one worker each.
MAX_WORKERS = 128
# Nodes per group, and in the whole job: Slurm and Kubernetes dry runs spell out one task per node.
MAX_NODES = 256
MAX_JOB_NODES = 1024
# CPUs per node: the largest machines have 384 to 512 hardware threads.
MAX_CPUS = 1024
# Memory per node in MiB: 4 TiB, more than the largest nodes have.
MAX_MEMORY_MB = 4 * 1024 * 1024
# A GPU index on one machine: none shows more than 1024 devices.
MAX_GPU_INDEX = 1023

# Every timeout and duration, in seconds or milliseconds: nothing in a run needs to wait longer than a day
# (a Slurm node replacement takes minutes to hours), and a day stays far inside the integer milliseconds
# torchft, gloo and NCCL keep their timeouts in, where an infinite one overflows.
DAY_S = 86_400
DAY_MS = DAY_S * 1000
# The lighthouse re-evaluates a pending quorum this often at the slowest: every quorum waits up to a tick.
MAX_QUORUM_TICK_MS = 60_000
# torchft waits at least 100 ms between quorum tries, so a day's quorum timeout holds at most 864,000.
MAX_QUORUM_RETRIES = 1_000_000

# Local steps (and every step count: sync_every, eval_every, fault steps): a year at three steps a second.
MAX_STEPS = 100_000_000
# Seeds: the range every seeding API takes (numpy's is 32 bits; torch's and Python's are wider).
MAX_SEED = 2**32 - 1
# Learning rates: large-batch SGD schedules reach a few tens; above 100 is a typo.
MAX_LR = 100.0
# Weight decay: L2 coefficients are 1e-4 to 1e-1; above 1 every step would shrink a weight past zero.
MAX_WEIGHT_DECAY = 1.0
# Samples per worker per step: CIFAR-10's training set is 50,000 images.
MAX_BATCH = 50_000
# model.width: the residual network of width 1024 has about 2e9 parameters, far beyond any CIFAR-10 model.
MAX_WIDTH = 1024
# Restarts per group: a storm of failures restarts a group about once per failure.
MAX_RESTARTS = 10_000
# Streaming DiLoCo fragments: a fragment is at least one layer, and the models have a dozen or so.
MAX_FRAGMENTS = 64
# DiLoCo's allreduce buckets, in MiB: 64 GiB is more than any model here has.
MAX_BUCKET_MB = 65_536
# Checkpoints kept: each is a whole model and its optimizer state on disk.
MAX_CHECKPOINTS_KEPT = 1_000
# Failures: the storm benchmark injects 100; the plan of every failure is drawn once per process.
MAX_SCHEDULED_FAULTS = 1_000
MAX_RANDOM_FAULTS = 10_000
MAX_RANDOM_KINDS = 64  # the kinds to draw from, repeats weighting them

# The experiment's name is the torchx app name and a directory name. torchx appends '-' and an id of up to
# 14 characters, and Kubernetes allows 63 in a job's name: 48 keeps every scheduler's names valid.
NAME_MAX = 48
# Paths: Linux's PATH_MAX, and NAME_MAX for each part between slashes (ext4, xfs, btrfs).
PATH_MAX = 4096
PATH_PART_MAX = 255
URL_MAX = 2048

# The YAML document: the shipped configs are 1-2 KB and a thousand scheduled faults about 100 KB.
YAML_MAX_CHARS = 1_000_000
# Nodes once every alias is expanded (validation visits every copy): a thousand faults are about 15,000.
YAML_MAX_NODES = 50_000
# Nesting: the schema is four levels deep; PyYAML composes recursively, so depth is bounded before it.
YAML_MAX_DEPTH = 32

# How much of a value an error message quotes: enough to recognise it, never a whole document.
SHOWN_MAX = 80
