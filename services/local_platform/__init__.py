"""The embedded local stack: a Kafka-protocol broker (tansu), an S3-protocol server (moto), our inference server,
the controller, the wrappers and the local event plane, started and stopped as plain processes."""
