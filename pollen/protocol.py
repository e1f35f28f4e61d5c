"""Names both ends of a federation agree on: query requests, metric and node-config keys.

A key that travels between the server and its clients is spelled here once, so
the client (:mod:`pollen.client`) and the server (:mod:`pollen.server`) never
import each other for it.
"""

#: Query request: load the data and build the model now, before round 1.
PREPARE_REQUEST = "prepare"

#: Query request: the run is over (the client app touches its done file, then its node exits).
RUN_OVER_REQUEST = "run-over"

#: Query request: reply with the number of training examples (SecAgg+ needs it before round 1).
TRAIN_EXAMPLES_REQUEST = "train-examples"

#: Metric key of a train or evaluate reply: the client's number of examples (FedAvg's weight).
NUM_EXAMPLES_KEY = "num-examples"

#: Metric key of a train reply: the aggregation weight under DP (1 for every client).
UNIT_WEIGHT_KEY = "unit-weight"

#: Node-config key: a file the client app touches when the server says the run is over.
DONE_FILE_KEY = "pollen-done-file"

#: Legacy record name of a FitIns's parameters in a RecordDict (``flwr.compat``), used by SecAgg+.
FITINS_PARAMETERS = "fitins.parameters"
