"""Dock widget, map tool and dialogs of the IDGBR plugin."""
