"""`thunderserve up`: the local all-in-one launcher (NATS, router, prefill and decode replicas)."""
