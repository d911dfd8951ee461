# No settings at all: importing the module must leave the system as it was.
{ }
