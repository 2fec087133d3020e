"""Selling credits: payments through Razorpay payment links and Stripe Checkout, credited
from verified webhooks exactly once (see docs/payments.md)."""
