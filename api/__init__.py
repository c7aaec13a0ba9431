"""The segq HTTP API (Flask). ``segq.api.app.create_app`` builds the app; this
package imports nothing, so importing one API module loads only what it uses.
Never imports the worker or torch."""
