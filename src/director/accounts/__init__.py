"""Accounts: users, passwords, cookie sessions, API keys, rate limits and login throttling."""
