/* The peer for `cargo bench -p watt-worker --bench allreduce`: OpenMPI's MPI_Allreduce (sum of
 * doubles, in place) timed exactly as the Watt ring is: the same sizes, warm-up and iteration
 * counts. Prints "RESULT <bytes> <seconds per all-reduce>" from rank 0. */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    for (int a = 1; a < argc; a++) {
        long bytes = atol(argv[a]);
        long n = bytes / 8;
        int iters = (int)(512L * 1024 * 1024 / bytes);
        if (iters < 5) iters = 5;
        if (iters > 100) iters = 100;
        double *buf = malloc(n * sizeof(double));
        for (long i = 0; i < n; i++) buf[i] = 1.0;
        for (int w = 0; w < 2; w++) MPI_Allreduce(MPI_IN_PLACE, buf, n, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
        MPI_Barrier(MPI_COMM_WORLD);
        double t0 = MPI_Wtime();
        for (int i = 0; i < iters; i++) MPI_Allreduce(MPI_IN_PLACE, buf, n, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
        double t = (MPI_Wtime() - t0) / iters;
        if (rank == 0) printf("RESULT %ld %.9f\n", bytes, t);
        fflush(stdout);
        free(buf);
    }
    MPI_Finalize();
    return 0;
}
