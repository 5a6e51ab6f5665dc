"""twistd plugin: ``twistd -n llamaswap -c config.yaml``.

Kept tiny and lazy: importing this module must not import llamaswap itself.
"""

from twisted.application.service import ServiceMaker

llamaswap = ServiceMaker(
    "llamaswap",
    "llamaswap.service.tap",
    "On-demand model server swapping behind an OpenAI-compatible proxy.",
    "llamaswap",
)
