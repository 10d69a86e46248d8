"""Singer interoperability: messages, Arrow <-> JSON Schema, catalogs, the tap and the target."""
