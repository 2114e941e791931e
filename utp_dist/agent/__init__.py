"""Agents: processes that take queued runs from the dashboard, train them with utp_dist.train, and report back."""
