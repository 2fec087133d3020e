"""Importers: another system's data carried into the gateway through its own services
(grants through the engine, payments, plans, subscriptions and promo codes through the
selling services), each write idempotent so that an import can run again."""
