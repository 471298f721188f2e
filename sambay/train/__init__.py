"""Training: from text files to a trained model folder, on one process or under torchrun.

    corpus      the built-in public-domain corpora (where their texts are installed, cleaning)
    sources     which input files, of which kind, and their documents
    manifest    the format of a prepared token folder (manifest.json, token dtype, fingerprint)
    prepare     text -> token shards, written into a temporary folder and renamed in one step
    dataset     TokenDataset: packed, resumable, rank-sharded batches of a prepared folder
    settings    TrainSettings, the learning-rate schedule, the weight-decay groups
    plan        every check of a run before any work (settings, resume, data, model config)
    checkpoint  run.json, checkpoint/ and model/: what a run keeps to be resumed and hands over
    trainer     the training loop (`train`), signals, validation
    distributed torchrun / DDP / FSDP2 plumbing and full-state views for checkpoints
    log         metrics.jsonl, loss.png and the live progress line

The command-line flags are in sambay.cli.prepare and sambay.cli.train.
"""
