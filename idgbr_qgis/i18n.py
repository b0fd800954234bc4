"""Translation of the plugin's user-facing texts.

Every text the user reads goes through `tr` with the one context "IDGBR", so that Qt Linguist files made
for the plugin translate it. Texts with values are translated first and filled in after:
``tr("Added '{name}'.").format(name=...)``, never an f-string inside ``tr``.
"""

from __future__ import annotations

from qgis.PyQt.QtCore import QCoreApplication

CONTEXT = "IDGBR"


def tr(text: str) -> str:
    """``text`` in the user's language when a translation is installed, else as it is."""
    return QCoreApplication.translate(CONTEXT, text)
