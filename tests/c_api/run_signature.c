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
 * Build (see tests/test_export.py):
 *   gcc run_signature.c -I$TF/include -L$TF -l:libtensorflow_cc.so.2 \
 *       -l:libtensorflow_framework.so.2 -Wl,-rpath,$TF -o run_signature
 */
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

static void print_tensor(const char *name, TF_Tensor *t) {
  int ndims = TF_NumDims(t);
  int64_t count = 1;
  TF_DataType dtype = TF_TensorType(t);
  printf("output %s %d %d", name, (int)dtype, ndims);
  for (int d = 0; d < ndims; ++d) {
    printf(" %lld", (long long)TF_Dim(t, d));
    count *= TF_Dim(t, d);
  }
  printf("\n");
  const void *data = TF_TensorData(t);
  for (int64_t i = 0; i < count; ++i) {
    if (i) printf(" ");
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
  printf("\n");
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
