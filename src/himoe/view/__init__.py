"""`himoe view`: a local web page that shows where a trained model routes each token."""
