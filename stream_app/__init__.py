"""stream_app: a real-time push-targeting engine on Kafka (Faust shell around a pure core)."""

__version__ = "0.1.0"
