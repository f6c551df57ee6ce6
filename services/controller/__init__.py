"""The ML Controller: turns the DSL's workflow messages (``system.ML``) into wired workflow steps.

``published``: store the step's configuration (``StepConfigStore``) and wire the step's input topic to its Wrapper
(a Knative KafkaSource on Kubernetes, the local event plane otherwise); ``stopping``: unwire and delete; anything
else: nothing to do. ``reconciler.WorkflowController`` holds the logic as plain methods; ``http_app`` (KafkaSource
deliveries, status API) and ``system_consumer`` (plain Kafka consumer) are thin shells around it.
"""
