"""The record keys of fedsparse's messages, one meaning each; the wire strings never change."""

from __future__ import annotations

ARRAYS_KEY = "arrays"  # ArrayRecord with the packed vector (Flower's default `arrayrecord_key`)
METRICS_KEY = "metrics"  # MetricRecord of a train or evaluate reply
# ConfigRecord in which a client identifies itself: its method fingerprint (`FINGERPRINT_KEY`) in a
# train reply, its partition id (`PARTITION_KEY`) in a query reply.
INFO_KEY = "info"
FINGERPRINT_KEY = "fingerprint"  # the method fingerprint, in the identity record and the train config
PARTITION_KEY = "partition-id"  # the node's partition id, in the identity record and the node config
WEIGHT_KEY = "num-examples"  # a reply's weight in the average (Flower's `weighted_by_key`)
# What a train reply reports: its weight, mean local loss, seconds of local training, and seconds
# from the message's arrival (a fresh deployment process: its start) to the first training step.
TRAIN_METRICS = (WEIGHT_KEY, "train-loss", "train-seconds", "setup-seconds")
