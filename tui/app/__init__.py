"""The Textual chat app behind ``splitlm chat``: screens, widgets, workers and their messages.

Importing this package imports nothing heavy; ``splitlm.tui.app.app`` loads Textual, and the
engine modules load torch only when a worker first needs them.
"""
