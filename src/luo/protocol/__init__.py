"""The update's process-to-process protocols, one module per channel, each an I/O-free table
(``luo.protocol.table``): client↔host, host↔successor host, host↔VMM, VMM↔successor VMM."""
