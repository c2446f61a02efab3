"""``python -m device_agent``: the same as the ``edgepack-agent`` command."""

from device_agent.cli import main

main()
