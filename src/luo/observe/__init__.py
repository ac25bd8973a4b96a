"""Where the time of an update goes: the record's timeline, as a table, a plot and metrics.

``timeline`` reads and checks an update record and lays its phases out on one clock; ``table`` and
``plot`` show it (``luo timeline``, ``luo update --plot``); ``metrics`` turns every record and the
host's status into Prometheus text (``luo metrics``). Reading only: nothing here talks to a VMM or
changes the host. docs/observe.md.
"""
