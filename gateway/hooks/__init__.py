"""Durable side effects of the gateway: delivery-report callbacks and low-credit alerts.

`outbox` is the generic worker that runs stored items until they succeed or die; each kind
of item has a handler (`callbacks` for the delivery reports).
"""
