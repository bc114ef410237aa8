/* Runs one signature of a SavedModel through TensorFlow's C API.
 *
 * This is the load path of TF Serving: TF_LoadSessionFromSavedModel with tag
 * "serve", then a session run that feeds and fetches the tensors named in the
 * signature's SignatureDef. No Python is involved.
 *
 * Usage:
 *   run_signature EXPORT_DIR INPUT_TENSOR DTYPE INPUT_FILE DIMS OUTPUT_TENSOR...
 *
 *   INPUT_TENSOR, OUTPUT_TENSOR: graph tensor names "op_name:index", as read
 *       from the SignatureDef (e.g. "score_inputs:0").
 *   DTYPE: dtype of the raw input file: float32, float64, int32, int64 or
 *       uint8.
 *   INPUT_FILE: the input tensor as raw little-endian values, row-major.
 *   DIMS: comma-separated input shape, e.g. "4,8".
 *
 * Prints, for each output, one line "output NAME DTYPE NDIMS DIM..." and one
 * line of its values (floats with 9 significant digits, "nan" for NaN).
 * Exit status 0 on success; 1 with "error: CODE MESSAGE" on stderr when
 * TensorFlow reports an error; 2 for bad usage.
 *
 * Load mode: with RUN_SIGNATURE_BATCHES=FILE in the environment (int32 batch
 * sizes, one per request, summing to the input's first dimension), the input
 * rows are split into those requests, which run on one thread, then on
 * RUN_SIGNATURE_THREADS threads (default 8) at once on the same session,
 * request r on thread r % THREADS. A line "load: R requests on T threads, A
 * answered, D differ from one thread" compares the two runs byte for byte;
 * the concurrent run's outputs are printed as above, each the concatenation
 * of the requests' outputs in request order.
 *
 * Build (see tests/test_export.py):
 *   gcc run_signature.c -I$TF/include -L$TF -l:libtensorflow_cc.so.2 \
 *       -l:libtensorflow_framework.so.2 -Wl,-rpath,$TF -o run_signature
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tensorflow/c/c_api.h"

static int check(TF_Status *status, const char *what) {
  if (TF_GetCode(status) != TF_OK) {
    fprintf(stderr, "error: %d %s: %s\n", (int)TF_GetCode(status), what,
            TF_Message(status));
    return 0;
  }
  return 1;
}

/* Splits "op_name:index" into the graph operation and its output index. */
static int lookup_output(TF_Graph *graph, const char *name, TF_Output *out) {
  char op_name[1024];
  const char *colon = strrchr(name, ':');
  size_t len = colon ? (size_t)(colon - name) : strlen(name);
  if (len >= sizeof(op_name)) return 0;
  memcpy(op_name, name, len);
  op_name[len] = '\0';
  out->oper = TF_GraphOperationByName(graph, op_name);
  out->index = colon ? atoi(colon + 1) : 0;
  if (out->oper == NULL) {
    fprintf(stderr, "error: no operation '%s' in the graph\n", op_name);
    return 0;
  }
  return 1;
}

static void noop_deallocator(void *data, size_t len, void *arg) {
  (void)data;
  (void)len;
  (void)arg;
}

/* Prints the values of `t`, after a space unless `first`. */
static void print_values(TF_Tensor *t, int first) {
  int64_t count = 1;
  TF_DataType dtype = TF_TensorType(t);
  for (int d = 0; d < TF_NumDims(t); ++d) count *= TF_Dim(t, d);
  const void *data = TF_TensorData(t);
  for (int64_t i = 0; i < count; ++i) {
    if (i || !first) printf(" ");
    switch (dtype) {
      case TF_FLOAT:
        printf("%.9g", (double)((const float *)data)[i]);
        break;
      case TF_DOUBLE:
        printf("%.17g", ((const double *)data)[i]);
        break;
      case TF_INT64:
        printf("%lld", (long long)((const int64_t *)data)[i]);
        break;
      case TF_INT32:
        printf("%d", ((const int32_t *)data)[i]);
        break;
      case TF_BOOL:
        printf("%d", (int)((const unsigned char *)data)[i]);
        break;
      default:
        printf("?");
    }
  }
}

/* Prints "output NAME DTYPE NDIMS DIM...", the first dimension `batch`. */
static void print_header(const char *name, TF_Tensor *t, int64_t batch) {
  int ndims = TF_NumDims(t);
  printf("output %s %d %d", name, (int)TF_TensorType(t), ndims);
  for (int d = 0; d < ndims; ++d) {
    printf(" %lld", (long long)(d == 0 ? batch : TF_Dim(t, d)));
  }
  printf("\n");
}

static void print_tensor(const char *name, TF_Tensor *t) {
  print_header(name, t, TF_NumDims(t) ? TF_Dim(t, 0) : 0);
  print_values(t, 1);
  printf("\n");
}

/* Load mode: requests run at once from several threads on one session. */
typedef struct {
  TF_Session *session;
  TF_Output input;
  TF_Output *outputs;
  int num_outputs;
  TF_DataType dtype;
  const char *data;    /* every request's rows */
  size_t row_bytes;    /* bytes of one example */
  const int64_t *dims; /* the input's dims (the first is replaced) */
  int ndims;
  const int32_t *batches;
  const int64_t *first_row;
  int num_requests;
  int num_threads;
  TF_Tensor **results; /* [request * num_outputs + output] */
} Load;

typedef struct {
  Load *load;
  int thread;
  int done;
  TF_Code code;
  char message[512];
} Worker;

static void *run_requests(void *arg) {
  Worker *w = arg;
  Load *l = w->load;
  TF_Status *status = TF_NewStatus();
  int64_t dims[16];
  memcpy(dims, l->dims, sizeof(int64_t) * (size_t)l->ndims);
  for (int r = w->thread; r < l->num_requests; r += l->num_threads) {
    dims[0] = l->batches[r];
    size_t nbytes = (size_t)l->batches[r] * l->row_bytes;
    TF_Tensor *input = TF_NewTensor(
        l->dtype, dims, l->ndims,
        (void *)(l->data + (size_t)l->first_row[r] * l->row_bytes), nbytes,
        noop_deallocator, NULL);
    TF_SessionRun(l->session, NULL, &l->input, &input, 1, l->outputs,
                  l->results + (size_t)r * l->num_outputs, l->num_outputs,
                  NULL, 0, NULL, status);
    TF_DeleteTensor(input);
    if (TF_GetCode(status) != TF_OK) {
      w->code = TF_GetCode(status);
      snprintf(w->message, sizeof(w->message), "request %d: %s", r,
               TF_Message(status));
      break;
    }
    w->done++;
  }
  TF_DeleteStatus(status);
  return NULL;
}

/* Runs every request on `num_threads` threads; their outputs go to `results`.
 * Returns the number of requests answered, or -1 after an error. */
static int run_all(Load *l, int num_threads, TF_Tensor **results) {
  l->num_threads = num_threads;
  l->results = results;
  pthread_t *threads = calloc((size_t)num_threads, sizeof(pthread_t));
  Worker *workers = calloc((size_t)num_threads, sizeof(Worker));
  int started = 0;
  for (; started < num_threads; ++started) {
    workers[started].load = l;
    workers[started].thread = started;
    workers[started].code = TF_OK;
    if (pthread_create(&threads[started], NULL, run_requests,
                       &workers[started]) != 0) {
      fprintf(stderr, "error: cannot start thread %d\n", started);
      break;
    }
  }
  int done = started == num_threads ? 0 : -1;
  for (int t = 0; t < started; ++t) {
    pthread_join(threads[t], NULL);
    if (workers[t].code != TF_OK) {
      fprintf(stderr, "error: %d thread %d, %s\n", (int)workers[t].code, t,
              workers[t].message);
      done = -1;
    } else if (done >= 0) {
      done += workers[t].done;
    }
  }
  free(threads);
  free(workers);
  return done;
}

/* Whether two tensors have the same dtype, shape and bytes. */
static int same_tensor(TF_Tensor *a, TF_Tensor *b) {
  if (TF_TensorType(a) != TF_TensorType(b) || TF_NumDims(a) != TF_NumDims(b) ||
      TF_TensorByteSize(a) != TF_TensorByteSize(b)) {
    return 0;
  }
  for (int d = 0; d < TF_NumDims(a); ++d) {
    if (TF_Dim(a, d) != TF_Dim(b, d)) return 0;
  }
  return memcmp(TF_TensorData(a), TF_TensorData(b), TF_TensorByteSize(a)) == 0;
}

/* Runs the requests of RUN_SIGNATURE_BATCHES on one thread, then on
 * `l->num_threads` at once; compares the answers byte for byte and prints
 * the concurrent run's outputs. */
static int run_load(Load *l, const char *batches_file, char **names) {
  FILE *f = fopen(batches_file, "rb");
  if (f == NULL) {
    fprintf(stderr, "cannot open '%s'\n", batches_file);
    return 2;
  }
  fseek(f, 0, SEEK_END);
  long size = ftell(f);
  fseek(f, 0, SEEK_SET);
  l->num_requests = (int)(size / 4);
  int32_t *batches = malloc((size_t)size + 4);
  int64_t *first_row = calloc((size_t)l->num_requests + 1, sizeof(int64_t));
  if (fread(batches, 4, (size_t)l->num_requests, f) != (size_t)l->num_requests) {
    fprintf(stderr, "cannot read '%s'\n", batches_file);
    return 2;
  }
  fclose(f);
  for (int r = 0; r < l->num_requests; ++r) {
    if (batches[r] < 1) {
      fprintf(stderr, "bad batch size %d\n", batches[r]);
      return 2;
    }
    first_row[r + 1] = first_row[r] + batches[r];
  }
  if (first_row[l->num_requests] != l->dims[0]) {
    fprintf(stderr, "the batches sum to %lld rows, the input has %lld\n",
            (long long)first_row[l->num_requests], (long long)l->dims[0]);
    return 2;
  }
  l->batches = batches;
  l->first_row = first_row;
  size_t count = (size_t)l->num_requests * (size_t)l->num_outputs;
  TF_Tensor **sequential = calloc(count, sizeof(TF_Tensor *));
  TF_Tensor **concurrent = calloc(count, sizeof(TF_Tensor *));
  int num_threads = l->num_threads;
  if (run_all(l, 1, sequential) < 0) return 1;
  int done = run_all(l, num_threads, concurrent);
  if (done < 0) return 1;
  int differ = 0;
  for (int r = 0; r < l->num_requests; ++r) {
    for (int i = 0; i < l->num_outputs; ++i) {
      size_t k = (size_t)r * l->num_outputs + i;
      if (concurrent[k] == NULL || !same_tensor(concurrent[k], sequential[k])) {
        differ++;
        break;
      }
    }
  }
  printf("load: %d requests on %d threads, %d answered, %d differ from one thread\n",
         l->num_requests, num_threads, done, differ);
  for (int i = 0; i < l->num_outputs; ++i) {
    print_header(names[i], concurrent[i], l->dims[0]);
    for (int r = 0; r < l->num_requests; ++r) {
      print_values(concurrent[(size_t)r * l->num_outputs + i], r == 0);
    }
    printf("\n");
  }
  for (size_t k = 0; k < count; ++k) {
    if (sequential[k]) TF_DeleteTensor(sequential[k]);
    if (concurrent[k]) TF_DeleteTensor(concurrent[k]);
  }
  free(sequential);
  free(concurrent);
  free(first_row);
  free(batches);
  return 0;
}

int main(int argc, char **argv) {
  if (argc < 7) {
    fprintf(stderr,
            "usage: %s EXPORT_DIR INPUT_TENSOR DTYPE INPUT_FILE DIMS "
            "OUTPUT_TENSOR...\n",
            argv[0]);
    return 2;
  }
  const char *export_dir = argv[1];
  const char *input_name = argv[2];
  const char *dtype_name = argv[3];
  const char *input_file = argv[4];
  const char *dims_text = argv[5];
  int num_outputs = argc - 6;

  TF_DataType dtype;
  size_t item_size;
  if (strcmp(dtype_name, "float32") == 0) {
    dtype = TF_FLOAT;
    item_size = 4;
  } else if (strcmp(dtype_name, "float64") == 0) {
    dtype = TF_DOUBLE;
    item_size = 8;
  } else if (strcmp(dtype_name, "int32") == 0) {
    dtype = TF_INT32;
    item_size = 4;
  } else if (strcmp(dtype_name, "int64") == 0) {
    dtype = TF_INT64;
    item_size = 8;
  } else if (strcmp(dtype_name, "uint8") == 0) {
    dtype = TF_UINT8;
    item_size = 1;
  } else {
    fprintf(stderr, "unsupported DTYPE '%s'\n", dtype_name);
    return 2;
  }

  int64_t dims[16];
  int ndims = 0;
  size_t count = 1;
  for (const char *p = dims_text; *p && ndims < 16;) {
    char *end;
    dims[ndims] = strtoll(p, &end, 10);
    if (end == p || dims[ndims] < 0) {
      fprintf(stderr, "bad DIMS '%s'\n", dims_text);
      return 2;
    }
    count *= (size_t)dims[ndims++];
    p = (*end == ',') ? end + 1 : end;
  }

  size_t nbytes = count * item_size;
  void *buffer = malloc(nbytes ? nbytes : 1);
  FILE *f = fopen(input_file, "rb");
  if (f == NULL || fread(buffer, 1, nbytes, f) != nbytes) {
    fprintf(stderr, "cannot read %zu bytes from '%s'\n", nbytes, input_file);
    return 2;
  }
  fclose(f);

  TF_Status *status = TF_NewStatus();
  TF_Graph *graph = TF_NewGraph();
  TF_SessionOptions *options = TF_NewSessionOptions();
  TF_Buffer *meta_graph = TF_NewBuffer();
  const char *tags[] = {"serve"};
  TF_Session *session = TF_LoadSessionFromSavedModel(
      options, NULL, export_dir, tags, 1, graph, meta_graph, status);
  if (!check(status, "TF_LoadSessionFromSavedModel")) return 1;
  printf("loaded %s tag serve, MetaGraphDef %zu bytes\n", export_dir,
         meta_graph->length);

  TF_Output input;
  if (!lookup_output(graph, input_name, &input)) return 1;
  TF_Output *outputs = calloc((size_t)num_outputs, sizeof(TF_Output));
  TF_Tensor **values = calloc((size_t)num_outputs, sizeof(TF_Tensor *));
  for (int i = 0; i < num_outputs; ++i) {
    if (!lookup_output(graph, argv[6 + i], &outputs[i])) return 1;
  }

  const char *batches_file = getenv("RUN_SIGNATURE_BATCHES");
  if (batches_file != NULL) {
    const char *threads = getenv("RUN_SIGNATURE_THREADS");
    Load load = {.session = session,
                 .input = input,
                 .outputs = outputs,
                 .num_outputs = num_outputs,
                 .dtype = dtype,
                 .data = buffer,
                 .row_bytes = ndims && dims[0] ? nbytes / (size_t)dims[0] : 0,
                 .dims = dims,
                 .ndims = ndims,
                 .num_threads = threads ? atoi(threads) : 8};
    if (ndims < 1 || load.num_threads < 1) {
      fprintf(stderr, "load mode needs a batch dimension and THREADS >= 1\n");
      return 2;
    }
    int code = run_load(&load, batches_file, argv + 6);
    TF_CloseSession(session, status);
    TF_DeleteSession(session, status);
    return code;
  }

  TF_Tensor *input_tensor = TF_NewTensor(dtype, dims, ndims, buffer, nbytes,
                                         noop_deallocator, NULL);
  TF_SessionRun(session, NULL, &input, &input_tensor, 1, outputs, values,
                num_outputs, NULL, 0, NULL, status);
  if (!check(status, "TF_SessionRun")) return 1;

  for (int i = 0; i < num_outputs; ++i) {
    print_tensor(argv[6 + i], values[i]);
    TF_DeleteTensor(values[i]);
  }

  TF_DeleteTensor(input_tensor);
  TF_CloseSession(session, status);
  TF_DeleteSession(session, status);
  TF_DeleteBuffer(meta_graph);
  TF_DeleteSessionOptions(options);
  TF_DeleteGraph(graph);
  TF_DeleteStatus(status);
  free(outputs);
  free(values);
  free(buffer);
  return 0;
}
