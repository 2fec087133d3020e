"""Plans and subscriptions: plan terms (plans/catalog.py), calendar periods
(plans/periods.py), and subscriptions that renew exactly once per period
(plans/subscriptions.py)."""
