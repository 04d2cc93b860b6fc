# keras-cwsn on the official TensorFlow GPU image (tag pinned to requirements.txt's TensorFlow).
FROM tensorflow/tensorflow:2.21.0-gpu

WORKDIR /opt/keras-cwsn
COPY requirements-common.txt ./
RUN python -m pip install --no-cache-dir -r requirements-common.txt
COPY keras_cwsn ./keras_cwsn
COPY configs ./configs
COPY train.py ./

# Runs and caches live in mounted folders: -v "$PWD/runs:/opt/keras-cwsn/runs" -v DATA:/data
ENV KERAS_CWSN_CACHE=/opt/keras-cwsn/runs/.cache
ENTRYPOINT ["python", "train.py"]
