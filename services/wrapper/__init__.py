"""The Wrapper: one generic service per deployed task.

It takes a step message, reads the input from S3 (``services.wrapper.inputs``), preprocesses Sentinel-2 into
tensors, calls the inference server, writes the results and publishes the next step message.
"""
