"""The hospital side: data checks, preprocessing, local training, signatures."""
